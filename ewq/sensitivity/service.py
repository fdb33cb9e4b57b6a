"""One object that measures sensitivity: the model and its unperturbed outputs on fixed windows, held
once; the KLD (and NLL) of the model with any set of tensors swapped for their round trips.

Cost: one forward pass per measurement and window. The output of every decoder layer is kept from
the unperturbed run and replayed for the layers before the first block a measurement changes,
which only the perturbation after them can change (Replay), so a tensor in block b runs the layers
from b on (half of them on average). The reference logits are kept, float32, for the scored rows only.

llama.cpp's arithmetic (quant_types.Arithmetic): a quantized matmul in llama.cpp rounds its input to
int8 blocks first (llamacpp.activations). `measure` can do the same to the input of every swapped
tensor, and `activation_errors` gives, from one unperturbed pass, each tensor's relative output error
from that rounding alone, in the units of its weights' error e_t(q).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterable

import torch

from ..console import progress
from ..experts import ModelTensors
from ..llamacpp import activations
from ..llamacpp.quantizers import ImportanceMatrix, ratio, row_chunks
from ..metrics.kld import token_kld
from ..quant_types import Arithmetic, LlamaType, activation_type, gguf_menu
from ..rearranged import Part
from .swap import Change, swapped

if TYPE_CHECKING:  # annotations only: ewq.plan's scores import this module
    from ..plan.entries import TensorEntry


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    """The ModuleList of decoder layers (as many as config.num_hidden_layers) and its name."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return name, module
    return None


class Replay:
    """Record every decoder layer's output on the unperturbed model; then, for a perturbation in
    block b, hand layers 0..b-1 their recorded output instead of running them."""

    def __init__(self, model: torch.nn.Module):
        found = decoder_layers(model)
        self.prefix, self.layers = found if found else ("", None)
        self.outputs: list[list] = []  # [window][layer] -> what the layer returned

    @contextmanager
    def recording(self):
        if self.layers is None:
            yield
            return
        current: list = []
        self.outputs.append(current)
        hooks = [layer.register_forward_hook(lambda module, args, output: current.append(output))
                 for layer in self.layers]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def first_block(self, entry: TensorEntry) -> int:
        """The first layer that must run when `entry` changes: its block, or 0 outside the layers."""
        inside = self.layers is not None and entry.block is not None and \
            entry.hf_name.startswith(f"{self.prefix}.{entry.block}.")
        return entry.block if inside else 0

    @contextmanager
    def skipping(self, window: int, first: int):
        """Layers 0..first-1 return their recorded output; afterwards each has its forward back (an instance's
        own, as accelerate's device-map hooks install, or the class's)."""
        own = {index: self.layers[index].__dict__.get("forward") for index in range(first)}
        for index in range(first):
            self.layers[index].forward = lambda *args, _out=self.outputs[window][index], **kwargs: _out
        try:
            yield
        finally:
            for index, forward in own.items():
                if forward is None:
                    del self.layers[index].forward
                else:
                    self.layers[index].forward = forward


@dataclass(frozen=True)
class Group:
    """Tensors measured together: one tensor (its hf_name), or one kind of tensor over a band of layers."""
    name: str
    entries: tuple[TensorEntry, ...]


def groups_for(entries: list[TensorEntry], band: int | None) -> list[Group]:
    """Each entry alone (band None), or per tensor kind and band of `band` layers (blocks 0..band-1, ...);
    tensors outside the layers (embedding, head) stay alone."""
    if band is None:
        return [Group(e.hf_name, (e,)) for e in entries]
    members: dict[tuple[str, int], list[TensorEntry]] = {}
    for e in entries:
        key = (e.hf_name, -1) if e.block is None else (e.hf_name.replace(f".{e.block}.", ".{}.", 1), e.block // band)
        members.setdefault(key, []).append(e)
    groups = []
    for (kind, band_index), group in members.items():
        blocks = [e.block for e in group]
        name = kind if band_index < 0 else f"{kind}[{min(blocks)}-{max(blocks)}]"
        groups.append(Group(name, tuple(group)))
    return groups


@dataclass(frozen=True)
class Reference:
    """The unperturbed model's output on one window's scored rows: logits, float32 [rows, vocab]; their
    softmax is taken a few rows at a time when compared (metrics.kld.token_kld), not held beside them."""
    logits: torch.Tensor


@dataclass(frozen=True)
class Measurement:
    """One measurement over every window: per window its mean KLD (and NLL where targets are scored);
    per token the KLD, [windows · rows] float64."""
    per_window_kld: list[float]
    token_kld: torch.Tensor
    per_window_nll: list[float] | None = None

    @property
    def mean_kld(self) -> float:
        return sum(self.per_window_kld) / len(self.per_window_kld)


def _float32_head(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of the output projection: its product again in float32, whatever the model's dtype."""
    bias = None if getattr(module, "bias", None) is None else module.bias.float()
    return torch.nn.functional.linear(inputs[0].float(), module.weight.float(), bias)


def window_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """[tokens, vocab] float32 logits of one window of token ids. The decoder runs in the model's dtype,
    the output projection in float32 (its weight as it is at the call: a swapped head is measured): bf16
    logits are rounded to about 2^-8 of their size, a floor under the ΔKLD of one tensor of a large model.
    A float32 model runs as it is."""
    head = model.get_output_embeddings()
    handle = None if head is None or model.dtype == torch.float32 else head.register_forward_hook(_float32_head)
    try:
        return model(input_ids=ids[None], use_cache=False).logits[0].float()
    finally:
        if handle is not None:
            handle.remove()


def _round_input(activation: LlamaType, module: torch.nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the module's input as llama.cpp's matmul sees it (activations.round_trip)."""
    return (activations.round_trip(args[0], activation), *args[1:])


def _accumulate(sums: dict, module: torch.nn.Module, args: tuple) -> None:
    """Forward pre-hook: per input column, Σ x² ("x") and Σ (round trip − x)² for each activation type."""
    x = args[0].reshape(-1, args[0].shape[-1]).float()
    sums["x"] += (x.double() ** 2).sum(dim=0)
    for activation in [key for key in sums if key != "x"]:
        sums[activation] += ((activations.round_trip(x, activation) - x).double() ** 2).sum(dim=0)


class SensitivityService:
    """The model, its windows and its unperturbed outputs, computed once at construction; `measure`
    swaps tensors for their round trips, runs the windows, restores the model.

    windows     [n, context] token ids; `scored` the rows of each window compared (all by default);
                with `nll`, row i also scores the window's token i+1 (rows must end before the last)
    parts       part name -> Part of the matrices the converter rearranges (rearranged.by_name)
    references  the unperturbed outputs of these windows, if already at hand (a cache of an earlier run's
                `references`): no unperturbed pass is made, and no layer output recorded, so every
                measurement runs every layer"""

    @torch.inference_mode()
    def __init__(self, model: torch.nn.Module, windows: torch.Tensor, imatrix: ImportanceMatrix | None,
                 parts: dict[str, Part] | None = None, scored: slice = slice(None), nll: bool = False,
                 references: list[Reference] | None = None):
        device = next(model.parameters()).device
        self.model, self.imatrix, self.scored = model, imatrix, scored
        self.windows = windows.to(device)
        self.tensors, self.replay = ModelTensors(model, parts), Replay(model)
        self.linears = {id(m.weight): m for m in model.modules() if isinstance(m, torch.nn.Linear)}
        self.targets = self._targets() if nll else None
        if references is not None and len(references) != len(self.windows):
            raise ValueError(f"{len(references)} references for {len(self.windows)} windows")
        self.references = [] if references is None else [Reference(r.logits.to(device)) for r in references]
        for window in self.windows if references is None else []:
            with self.replay.recording():
                self.references.append(Reference(window_logits(model, window)[scored]))
        self.base_nll = [self._nll(r.logits, i) for i, r in enumerate(self.references)] if nll else None

    def _targets(self) -> torch.Tensor:
        positions = torch.arange(self.windows.shape[1], device=self.windows.device)[self.scored]
        if positions.numel() and int(positions[-1]) + 1 >= self.windows.shape[1]:
            raise ValueError("scored rows must end before the window's last token to score its next token")
        return self.windows[:, positions + 1]  # [n, rows]

    def _nll(self, logits: torch.Tensor, window: int) -> float:
        logprobs = torch.log_softmax(logits, dim=-1)
        return float(-logprobs.gather(1, self.targets[window][:, None]).double().mean())

    def linear(self, entry: TensorEntry) -> torch.nn.Linear | None:
        """The nn.Linear that multiplies by the entry's parameter (a tied embedding: the output projection);
        None where none does (an embedding lookup, a stack of experts, a rearranged part)."""
        try:
            parameter = self.model.get_parameter(entry.hf_name)
        except AttributeError:
            return None
        return self.linears.get(id(parameter))

    def _activation_types(self, entry: TensorEntry, types: Iterable[LlamaType],
                          arithmetic: Arithmetic) -> tuple[torch.nn.Linear | None, set[LlamaType]]:
        """The entry's Linear and the activation types its inputs take for `types` (those whose blocks fit)."""
        module = self.linear(entry)
        if module is None:
            return None, set()
        rounded = {activation_type(t, arithmetic) for t in types} - {None}
        return module, {a for a in rounded if module.in_features % activations.BLOCK.get(a, 1) == 0}

    def _round_hooks(self, entry: TensorEntry, llama_type: LlamaType, arithmetic: Arithmetic) -> list:
        """Hooks that round the input of the entry's matmul as llama.cpp does for `llama_type` (their handles)."""
        module, rounded = self._activation_types(entry, [llama_type], arithmetic)
        return [module.register_forward_pre_hook(partial(_round_input, a)) for a in rounded]

    @contextmanager
    def rounded_inputs(self, changes: list[Change], arithmetic: Arithmetic):
        """Inside the block, the input of each changed tensor's matmul is rounded as llama.cpp rounds it
        for the tensor's new type."""
        handles = []
        try:
            for entry, llama_type in changes:
                handles += self._round_hooks(entry, llama_type, arithmetic)
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.inference_mode()
    def activation_errors(self, entries: list[TensorEntry], arithmetic: Arithmetic) -> dict[str, dict[str, float]]:
        """hf_name -> {activation type: r}, r the relative error of the tensor's output when only its input
        is rounded to that type, over the windows' unperturbed inputs: Σⱼ E[δxⱼ²] ‖wⱼ‖² / Σⱼ E[xⱼ²] ‖wⱼ‖²
        over its input columns j (the rounding errors are independent per value, so the cross terms
        vanish): the units of the weights' e_t(q), so that α_t turns either into ΔKLD. One pass; the
        entries no Linear multiplies, or whose menu rounds no input, are left out."""
        sums, handles = {}, []
        try:
            for entry in entries:
                module, rounded = self._activation_types(entry, gguf_menu(entry.ncols), arithmetic)
                if rounded:
                    zeros = partial(torch.zeros, module.in_features, dtype=torch.float64, device=module.weight.device)
                    sums[entry.hf_name] = (module, {"x": zeros(), **{a: zeros() for a in rounded}})
                    handles.append(module.register_forward_pre_hook(partial(_accumulate, sums[entry.hf_name][1])))
            for window in self.windows:
                window_logits(self.model, window)
        finally:
            for handle in handles:
                handle.remove()
        errors = {}
        for name, (module, sums_of) in sums.items():
            weight = module.weight.detach()  # ‖wⱼ‖², [in], summed a chunk of rows at a time (a head is large)
            column_energy = sum((weight[rows].double() ** 2).sum(dim=0) for rows in row_chunks(*weight.shape))
            energy = float(sums_of["x"] @ column_energy)
            errors[name] = {a.value: ratio(sums_of[a] @ column_energy, energy) for a in sums_of if a != "x"}
        return errors

    @torch.inference_mode()
    def measure(self, changes: Iterable[Change], errors: dict[str, float] | None = None,
                arithmetic: Arithmetic = Arithmetic.WEIGHTS, restore: bool = True) -> Measurement:
        """The windows with every (entry, type) of `changes` at once (swap.swapped); `errors` and `restore`
        as there (without restore the service is spent: its model stays perturbed); with `arithmetic` CPU
        or CUDA the swapped tensors' inputs are rounded as llama.cpp's matmuls round them."""
        changes = list(changes)
        recorded = bool(self.replay.outputs)
        first = min((self.replay.first_block(entry) for entry, _ in changes), default=0) if recorded else 0
        rounding = nullcontext() if arithmetic is Arithmetic.WEIGHTS else self.rounded_inputs(changes, arithmetic)
        with swapped(self.tensors, changes, self.imatrix, errors, restore), rounding:
            return self._run_windows(first)

    def _run_windows(self, first: int = 0) -> Measurement:
        """The windows through the model as it is now, layers before `first` replayed, against the references."""
        per_window, tokens, nll = [], [], [] if self.targets is not None else None
        for index, (window, reference) in enumerate(zip(self.windows, self.references)):
            with self.replay.skipping(index, first):
                logits = window_logits(self.model, window)[self.scored]
            kl = token_kld(reference.logits, logits.to(reference.logits.device))
            per_window.append(float(kl.sum()) / kl.shape[0])
            tokens.append(kl)
            if nll is not None:
                nll.append(self._nll(logits, index))
        return Measurement(per_window, torch.cat(tokens), nll)

    @torch.inference_mode()
    def in_context(self, plan: list[Change], groups: list[Group], arithmetic: Arithmetic = Arithmetic.WEIGHTS,
                   on_group: Callable[[float, dict[str, float]], None] | None = None,
                   done: dict[str, float] | None = None) -> tuple[float, dict[str, float]]:
        """(KLD of the whole `plan` at once, group name -> its marginal ΔKLD in that context): KLD(plan) minus
        the KLD of the plan with only that group's members back at their original values (their inputs, in
        llama.cpp's arithmetic, no longer rounded). Every measurement runs every layer (the layers before a
        group are perturbed too); the plan is swapped once, the original values kept to restore (about half
        the model, swap.exact_copy), one group's round trips held aside at a time. `done`: groups already
        measured; `on_group` sees the whole plan's KLD and all marginals after each group."""
        marginal, types = dict(done or {}), {entry.hf_name: llama_type for entry, llama_type in plan}
        rounding = partial(self._round_hooks, arithmetic=arithmetic) if arithmetic is not Arithmetic.WEIGHTS else None
        with swapped(self.tensors, plan, self.imatrix) as originals:
            hooks = {entry.hf_name: rounding(entry, llama_type) if rounding else [] for entry, llama_type in plan}
            try:
                whole = self._run_windows().mean_kld
                for group in progress([g for g in groups if g.name not in marginal], desc="in context", unit="group"):
                    held = [(e, self.tensors.values(e)) for e in group.entries if e.hf_name in originals]
                    for e, _ in held:  # back to the original, its input as it comes
                        self.tensors.assign(e, originals[e.hf_name])
                        for handle in hooks.pop(e.hf_name):
                            handle.remove()
                    marginal[group.name] = whole - self._run_windows().mean_kld
                    for e, values in held:  # the plan again
                        self.tensors.assign(e, values)
                        hooks[e.hf_name] = rounding(e, types[e.hf_name]) if rounding else []
                    if on_group is not None:
                        on_group(whole, marginal)
            finally:
                for handles in hooks.values():
                    for handle in handles:
                        handle.remove()
        return whole, marginal

    def measure_groups(self, groups: list[Group], types: dict[str, LlamaType], done: dict[str, float],
                       on_group: Callable[[dict[str, float]], None] | None = None) -> dict[str, float]:
        """group name -> mean ΔKLD with every member on its type (types: hf_name -> type) at once;
        `done` holds the groups already measured; `on_group` sees all after each group."""
        kld = dict(done)
        todo = [g for g in groups if g.name not in kld]
        unit = "tensor" if all(len(g.entries) == 1 for g in todo) else "group"
        for group in progress(todo, desc="sensitivity", unit=unit):
            kld[group.name] = self.measure((e, types[e.hf_name]) for e in group.entries).mean_kld
            if on_group is not None:
                on_group(kld)
        return kld
