"""Write a generated dataset from a checkout without installing: same as ``fasttrain make-data``.

python tools/make_data.py drawing OUT [--sessions 200] ...   (see fasttrain/data/make_data.py)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fasttrain.data.make_data import main

if __name__ == "__main__":
    raise SystemExit(main())
