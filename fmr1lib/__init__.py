"""fmr1lib: Faithful-MR1 (anchoring and reinforcing visual attention) on Qwen2.5-VL.

The numbered notebooks are thin narratives over this package; every piece of logic
lives here so that the same code runs in a notebook, headless under papermill, under
pytest, and on GPUs through ``accelerate launch -m fmr1lib``.
"""

__version__ = "0.1.0"
