"""Measured sensitivity: the KLD when tensors are swapped for their llama.cpp round trips.

    swap.py     swapped(): tensors replaced by their round trips for a while, then restored (the one swap)
    service.py  SensitivityService: the model's unperturbed outputs on fixed windows, held once; the KLD
                (ewq.metrics.kld, the one KLD) and NLL of any set of swapped tensors; Replay of the layers
                before them; groups of tensors measured at once
    cached.py   CachedSensitivity: the kld score's measurements of one model on its calibration windows,
                cached on disk per model, importance matrix and tokens, the service loaded on first need
Used by the kld score and its additivity check (plan.scores, plan.create) and by the sensitivity
study (ewq.study) alike.
"""
