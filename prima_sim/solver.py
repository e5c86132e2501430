"""How a plan was made: the solver's status and objective, and what the scheduler found (typed per scheduler).

Part of the :class:`~prima_sim.plan.Plan` contract (``Plan.solver``): Halda's exact search records its candidates per
k, any fallback, polish or headroom move (:class:`HaldaDetails`); prima.cpp's published algorithm its sets, binding
constraints and coefficients (:class:`PublishedDetails`); the baselines nothing.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator

from prima_sim.schema import FrozenModel


class KCandidate(FrozenModel):
    """The best plan Halda's search found for one number of rounds k."""

    k: int = Field(description="rounds of the ring per token")
    objective_s: float = Field(description="its predicted TPOT (seconds)")
    devices: tuple[str, ...] = Field(default=(), description="the devices it keeps, in ring order")
    windows: tuple[int, ...] = Field(default=(), description="their windows")
    gpu_layers: tuple[int, ...] = Field(default=(), description="their GPU layers per window")


class Fallback(FrozenModel):
    """Another scheduler's plan predicted faster than the search's (a bug of the search; never expected)."""

    source: str = Field(description="the scheduler whose plan was returned")
    tpot_s: float = Field(description="its predicted TPOT")
    search_tpot_s: float = Field(description="the search's predicted TPOT")


class Polish(FrozenModel):
    """The local search over GPU layer counts that improved the search's plan."""

    tpot_s: float = Field(description="predicted TPOT after")
    before_s: float = Field(description="predicted TPOT before")
    evaluations: int = Field(description="predictions made")


class Headroom(FrozenModel):
    """Layers moved off a device near its page-cache room at equal predicted TPOT (planner.prefer_headroom)."""

    layers_moved: int = Field(description="layers moved")
    min_headroom_bytes: float = Field(description="the smallest page-cache margin after (bytes)")
    before_bytes: float = Field(description="the smallest page-cache margin before (bytes)")


class KBySimulation(FrozenModel):
    """One k of ``plan --sim-k``: Halda's plan for it, predicted and simulated."""

    k: int = Field(description="rounds of the ring per token")
    analytic_tpot_s: float = Field(description="the cost model's TPOT")
    simulated_tpot_s: float = Field(description="the simulator's TPOT")
    windows: tuple[int, ...] | None = Field(default=None, description="the plan's windows (none: no plan)")
    note: str = Field(default="", description="why there is no plan, if so")


class HaldaDetails(FrozenModel):
    """How Halda's exact search made the plan (``--scheduler halda``)."""

    search: str = Field(default="", description="what was searched")
    bound: Literal["ring", "disk"] = Field(
        default="ring", description="what sets the TPOT: the ring or a disk"
    )
    chain_s: float = Field(default=0.0, description="the ring's chain time of the plan (seconds)")
    load_s: float = Field(default=0.0, description="the slowest prefetching disk's time (seconds)")
    k_candidates: tuple[KCandidate, ...] = Field(default=(), description="the best plan per k")
    dynamic_programs: int = Field(default=0, description="dynamic programs solved")
    searches: int = Field(default=0, description="device-set searches")
    log: tuple[str, ...] = Field(default=(), description="the search's log")
    search_objective_s: float | None = Field(default=None, description="the search's objective (seconds)")
    search_vs_predict: float | None = Field(default=None, description="(objective - predict()) / predict()")
    fallback: Fallback | None = Field(default=None, description="a faster baseline returned instead, if any")
    polish: Polish | None = Field(
        default=None, description="the GPU-layer local search, if it improved the plan"
    )
    headroom: Headroom | None = Field(
        default=None, description="layers moved for page-cache headroom, if any"
    )
    notes: tuple[str, ...] = Field(default=(), description="warnings and remarks")
    k_by_simulation: tuple[KBySimulation, ...] | None = Field(
        default=None, description="plan --sim-k: every k simulated"
    )
    simulated_tpot_s: float | None = Field(
        default=None, description="plan --sim-k: the chosen plan's simulated TPOT"
    )


class PublishedDetails(FrozenModel):
    """How prima.cpp's published Halda made the plan (``--scheduler prima``)."""

    algorithm: str = Field(description="what was run")
    sets: dict[str, str] = Field(default_factory=dict, description="each device's set, M1-M4")
    forced_m4: tuple[str, ...] = Field(default=(), description="devices forced into M4")
    binding: dict[str, tuple[str, ...]] = Field(
        default_factory=dict, description="binding constraints per device"
    )
    coefficients_ms: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="the program's coefficients per device (milliseconds, GB/s)"
    )
    iterations: int = Field(default=0, description="fixed-point iterations")
    ilp_solves: int = Field(default=0, description="integer programs solved")
    selection_rounds: int = Field(default=0, description="device-selection rounds")
    log: tuple[str, ...] = Field(default=(), description="the algorithm's log")


def _details_kind(v: Any) -> str:
    if isinstance(v, PublishedDetails) or (isinstance(v, dict) and "algorithm" in v):
        return "prima"
    return "halda"


SolverDetails = Annotated[
    Annotated[HaldaDetails, Tag("halda")] | Annotated[PublishedDetails, Tag("prima")],
    Discriminator(_details_kind),
]
"""The scheduler's details: Halda's search or prima.cpp's published algorithm (the baselines have none)."""


class SolverInfo(FrozenModel):
    """How the plan was made."""

    status: str = Field(default="manual", description="the solver's status, 'heuristic' or 'manual'")
    objective_s: float | None = Field(default=None, description="the solver's objective value")
    solve_time_s: float = Field(default=0.0, description="wall time spent planning")
    details: SolverDetails | None = Field(
        default=None,
        description="what the scheduler found (Halda's search, or prima.cpp's algorithm; none else)",
    )

    @field_validator("details", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        """Plans written before the details were typed hold ``{}`` for schedulers without details."""
        return None if isinstance(v, dict) and not v else v
