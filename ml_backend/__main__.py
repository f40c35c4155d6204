"""``python -m ml_backend``: serve the Label Studio ML backend under gunicorn (= ``madseg backend``)."""

import sys

from ml_backend.backend_cli import main

if __name__ == "__main__":
    sys.exit(main())
