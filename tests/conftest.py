import os
import pkgutil

import hfllm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# hfllm commands run as subprocesses by the tests get the rule of pyproject.toml's filterwarnings: a deprecation
# triggered by hfllm's own modules is an error. PYTHONWARNINGS matches module names literally, hence the list.
_own_modules = ["hfllm", *(m.name for m in pkgutil.walk_packages(hfllm.__path__, "hfllm."))]
os.environ["PYTHONWARNINGS"] = ",".join(
    f"error::{category}:{module}" for category in ("DeprecationWarning", "FutureWarning") for module in _own_modules
)
