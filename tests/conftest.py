import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# datasets' cache of runs without --cache_dir (and of their subprocesses) goes to a folder of this session, not $HOME
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="hf_emergence_tests_datasets_")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)
sys.path.insert(0, os.path.dirname(__file__))

import transformers  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
