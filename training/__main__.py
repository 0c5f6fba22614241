"""``python -m diffusion_blend.training`` / ``accelerate launch -m diffusion_blend.training``."""

import sys

from .cli import main

sys.exit(main())
