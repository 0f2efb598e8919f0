"""``python -m data.synth``: run the command (:func:`data.synth.generate.main`)."""
from common.cli import run_main
from data.synth.generate import main

if __name__ == "__main__":
    run_main(main)
