"""What every part of the benchmark uses: where it lives, its log, its error, its files."""

import os
import re
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)


def log(msg):
    print("[bench] " + msg, file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


def fill(template_path, values):
    with open(template_path) as f:
        text = f.read()
    for key, value in values.items():
        text = text.replace("@@%s@@" % key, str(value))
    left = re.findall(r"@@[A-Z_]+@@", text)
    if left:
        raise BenchError("unfilled placeholders in %s: %s" % (template_path, left))
    return text


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path
