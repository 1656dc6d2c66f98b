"""adaptedit: edit transformer models with geometric adapters.

Every method is a reparametrization W' = F(W, θ) with F(W, θ₀) = W; the base checkpoint is never
modified and θ₀ is stored next to θ. See docs/architecture.md.
"""

__version__ = "0.1.0"
