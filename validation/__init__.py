"""Method validation on an exactly solvable problem: Gaussian-mixture bases, quadratic/linear
rewards, exact tilted targets (see ``docs/validation.md``)."""
