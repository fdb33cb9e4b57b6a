#!/usr/bin/env python3
"""Does entropy predict sensitivity? KLD when only one block (or tensor kind) is 4-bit, vs its statistics."""
from ewq.commands.common import run_main
from ewq.commands.study import main

if __name__ == "__main__":
    run_main(main)
