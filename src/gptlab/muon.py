"""Muon and AdamW stepped as one torch.optim.Optimizer (the `optimizer=muon` option, gptlab/optim.py)."""

import torch


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon and AdamW as one optimizer, for everything that expects one: Lightning, LR schedulers,
    GradScaler, checkpoints.

    Its param_groups are the inner optimizers' own group dicts (Muon's first), so a scheduler's or
    GradScaler's pass over them reaches both, each group scaled from its own lr; and both inner optimizers
    use its `state` (keyed by parameter; their parameters are disjoint), so the inherited state_dict and
    load_state_dict cover both.
    """

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        super().__init__(muon.param_groups + adamw.param_groups, defaults={})  # adopts those very dicts
        self._share()

    def _share(self) -> None:
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # Lightning passes forward and backward as a closure
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # replaces self.param_groups and self.state: share the new ones
        self._share()
