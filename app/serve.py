"""``python -m app.serve run app/dashboard.py ...``: Streamlit's own command line, after importing in the main
thread every module the pages use.

Streamlit runs each browser session's script in a thread of its own. When several sessions open at once on
a fresh server, their threads import pandas, plotly, torch and the rest at the same time, and one of them
can see a module another thread is still initialising ("partially initialized module 'pandas' has no
attribute 'Series'", met with 8 concurrent sessions by ``bench/app_load.py``). Importing them once here,
before the server accepts a connection, takes that race away. ``steerscope app`` serves through this.
"""

from __future__ import annotations

import importlib
import sys
import warnings

PRELOAD = ("numpy", "pandas", "pyarrow", "pyarrow.parquet", "duckdb", "plotly.graph_objects", "plotly.express",
           "torch", "app.store", "app.views._ui", "probe.models", "probe.hooks", "probe.sites", "probe.tokens",
           "saes.base", "steering", "steering.patching", "steering.padding", "steering.illusion", "transformer_lens")


def preload() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in PRELOAD:
            importlib.import_module(name)


def main() -> int:
    preload()
    from streamlit.web.cli import main as streamlit_main

    return streamlit_main(prog_name="streamlit")


if __name__ == "__main__":
    sys.exit(main())
