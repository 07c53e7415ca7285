"""knowlm_nb: the helper package behind the KnowLM notebooks.

One module per stage of the recipe (see the README's map):

    config   profiles, parameters, paths          (cross-cutting)
    report   headline figures, environment check   (cross-cutting)
    batch    papermill runner for all notebooks    (cross-cutting)
    tiny     offline tokenizer + tiny Llama zoo    (notebook 00)
"""
from pathlib import Path

__version__ = "0.1.0"

#: Repository root (the folder holding notebooks/, env/, data_samples/).
ROOT = Path(__file__).resolve().parent.parent
