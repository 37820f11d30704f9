"""Conditional Attention (paper section 3.3): a routing-conditioned Squeeze-and-Excitation block.

``s = sigmoid(W_up [relu(W_down GAP(y)); onehot(route)])`` and the stage output is ``s * y``.
One module per stage, shared by all of the stage's procedures. With ``num_routes=0`` it is a plain
SE block (the paper's "CA-dagger" / "+SE" rows).

Routes it receives: the chosen procedure index in a routed stage. Before cloning (the "stem
network") there is no route: in training mode each sample gets a uniformly random route so that
the route input is meaningful when routing starts; in eval mode it gets the expectation of that
random input, the uniform vector ``1/N`` (deterministic, and the same for every sample).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConditionalAttention(nn.Module):
    def __init__(self, channels: int, num_routes: int, reduction: int = 16) -> None:
        super().__init__()
        if num_routes < 0:
            raise ValueError(f"num_routes must be >= 0, got {num_routes}")
        hidden = max(1, channels // reduction)
        self.channels = channels
        self.num_routes = num_routes
        self.reduction = reduction
        self.down = nn.Linear(channels, hidden)
        self.up = nn.Linear(hidden + num_routes, channels)
        self._eyes: dict = {}  # route codes' identity matrix per (device, dtype); not state

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_routes={self.num_routes}, reduction={self.reduction}"

    def route_code(self, routes: torch.Tensor | None, batch: int, device, dtype) -> torch.Tensor:
        """One-hot routes [B, N]; ``None`` means 'not routed yet' (random in training, uniform in eval)."""
        if routes is None:
            if self.training:
                routes = torch.randint(self.num_routes, (batch,), device=device)
            else:
                return torch.full((batch, self.num_routes), 1.0 / self.num_routes, device=device, dtype=dtype)
        # rows of an identity matrix: what one_hot gives, without its range checks (two reductions and
        # a host read per call), from an identity kept per device and dtype: at batch 1 each op saved counts
        return self._identity(device, dtype).index_select(0, routes)

    def _identity(self, device, dtype) -> torch.Tensor:
        key = (torch.device(device), dtype)
        eye = self._eyes.get(key)
        if eye is None:
            with torch.inference_mode(False):  # a plain tensor, usable outside inference mode later
                eye = torch.eye(self.num_routes, device=key[0], dtype=dtype)
            self._eyes[key] = eye
        return eye

    def forward(self, y: torch.Tensor, routes: torch.Tensor | None = None) -> torch.Tensor:
        z = F.relu(self.down(y.mean(dim=(2, 3))))
        if self.num_routes > 0:
            z = torch.cat([z, self.route_code(routes, y.shape[0], y.device, z.dtype)], dim=1)
        s = torch.sigmoid(self.up(z))
        return y * s.view(*s.shape, 1, 1)
