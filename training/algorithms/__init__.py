"""Training algorithms over denoising chains: pure functions of tensors, no I/O.

* ``dpok``: KL-regularised policy gradient (any reward);
* ``ddpo``: the same surrogate without the KL term (no ``alpha_ref``);
* ``adjoint_matching``: regression onto the lean adjoint on a memoryless chain (differentiable rewards).
"""

from .adjoint_matching import adjoint_matching_loss, lean_adjoint_step, terminal_adjoint
from .ddpo import ddpo_loss
from .dpok import clipped_policy_loss, dpok_loss

ALGORITHMS = ("dpok", "ddpo", "adjoint_matching")
#: the algorithms whose optimum is the tilt p_base exp(r / alpha_ref) (they write db.alpha_ref)
KL_REGULARISED = ("dpok", "adjoint_matching")

__all__ = ["ALGORITHMS", "KL_REGULARISED", "adjoint_matching_loss", "clipped_policy_loss", "ddpo_loss", "dpok_loss",
           "lean_adjoint_step", "terminal_adjoint"]
