"""``python -m data.synth``: run the command (:func:`data.synth.generate.main`)."""
import sys
from pathlib import Path

from common.cli import run_main
from data.synth.generate import main

if __name__ == "__main__":
    # argparse and run_main name the command after sys.argv[0], which is this file under -m; keep
    # the name they gave when the generator was the module data/synth.py (usage: synth.py ...)
    sys.argv[0] = str(Path(__file__).parent.with_suffix(".py"))
    run_main(main)
