"""``OneLineErrorParser``: an ``argparse.ArgumentParser`` whose errors are one line.

argparse prints the whole usage before a flag error; the project's command lines (sample.py,
``python -m ldm_jax.compare``; train.py through absl) answer every user error with one
``error: ...`` line naming the flag, exit status 2.
"""
from __future__ import annotations

import argparse


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")
