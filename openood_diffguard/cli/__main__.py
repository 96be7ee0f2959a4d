"""``python -m openood_diffguard.cli``: the ``openood-diffguard`` command."""
import sys

from . import main

sys.exit(main())
