"""The benchmark scripts, as a package: run one as `python -m benchmarks.<name>` or as `python benchmarks/<name>.py`
from the repository root (both work, with the same arguments). What the scripts share lives in `benchmarks.common`
(benchmark-only: the authors' library as a timing reference, the language-model benchmarks' inputs) and in
`cbinterp.reporting` (the report tail any measurement can use). A script imports `common` by the way it was started
(`from . import common` in the package, `import common` beside it as a file, where its folder is sys.path[0]);
`benchmarks/reference/` holds scripts for another Python (the authors' old stack), run as files only.
"""
