"""Build a tiny random Qwen2 model and an offline tokenizer in a folder (``review_lm.testing.tiny_model``).

    python tools/make_tiny_model.py --out outputs/tiny-qwen2
    python tools/make_tiny_model.py --out /tmp/tiny --tokenizer bpe --corpus example_movie_review_data.json
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from review_lm.testing.tiny_model import main  # noqa: E402 - after the path is set

if __name__ == "__main__":
    sys.exit(main())
