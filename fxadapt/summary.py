"""The adapter summary table, in AdapterHub's layout."""

from __future__ import annotations

from typing import Any


def rows(model: Any) -> list[dict[str, Any]]:
    base = sum(p.numel() for p in model.base.parameters())
    setup = model.active_adapters
    active = set() if setup is None else {setup} if isinstance(setup, str) else set(setup.flatten())
    out = []
    for name, adapter in model.adapters.items():
        n = adapter.num_parameters()
        out.append(
            dict(
                name=name,
                architecture=adapter.method.name,
                num_params=n,
                percent=100.0 * n / base if base else 0.0,
                active=name in active,
                train=any(p.requires_grad for p in adapter.parameters()),
                merged=name in model.merged_adapters,
            )
        )
    out.append(
        dict(
            name="Full model",
            architecture="",
            num_params=base,
            percent=100.0,
            active=None,
            train=any(p.requires_grad for p in model.base.parameters()),
            merged=None,
        )
    )
    return out


def render(table: list[dict[str, Any]]) -> str:
    width = 86
    head = f"{'Name':24}{'Architecture':14}{'#Param':>14}{'%Param':>10}{'Active':>8}{'Train':>7}{'Merged':>8}"
    lines = ["=" * width, head, "-" * width]

    def flag(v: Any) -> str:
        return "" if v is None else str(int(bool(v)))

    for i, r in enumerate(table):
        if i == len(table) - 1:
            lines.append("-" * width)
        lines.append(
            f"{r['name']:24}{r['architecture']:14}{r['num_params']:>14,}{r['percent']:>10.3f}"
            f"{flag(r['active']):>8}{flag(r['train']):>7}{flag(r['merged']):>8}"
        )
    lines.append("=" * width)
    return "\n".join(lines)
