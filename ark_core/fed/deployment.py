"""Deployment settings: the ``deployment:`` section of a federation YAML and of a site YAML.

They say where the server listens, which sites may join (their public keys) and how a site
reaches the server. They never change the run's result, so the run fingerprint ignores them.
Relative paths resolve against the YAML file's directory.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from ..config import Strict, require_unique

__all__ = ["ServerDeployment", "SiteDeployment", "SiteKey"]


class SiteKey(Strict):
    """A site allowed to join: its name and its public key (OpenSSH ECDSA, from ``ark keys``)."""

    name: str = Field(min_length=1)
    public_key: Path = Field(description="The site's .pub file.")
    max_examples: int | None = Field(
        None, gt=0,
        description="Cap on the example counts this site reports each round (its total and "
        "each task's): they weigh its update, and the coordinator, not the site, bounds them. "
        "Unset: the counts of the site's first accepted round become its cap.",
    )


class ServerDeployment(Strict):
    """The coordinator's side (``ark-server``)."""

    host: str = Field("0.0.0.0", description="Address the sites' port listens on.")
    port: int = Field(
        9092, ge=1, le=65535,
        description="The one port sites connect to (HTTPS, Fleet API only; open it to the sites).",
    )
    server_names: list[str] = Field(
        default_factory=list,
        description="DNS names and IPs the sites use for the server; `ark keys init` puts them "
        "in the server certificate.",
    )
    keys_dir: Path = Field(Path("keys"), description="ca.crt, server.crt and server.key.")
    sites: list[SiteKey] = Field(default_factory=list, description="Sites allowed to join.")
    superlink_port: int = Field(
        0, ge=0, le=65535,
        description="Loopback port of the SuperLink itself (Control and runtime APIs never "
        "leave the coordinator); 0 picks a free one at each start.",
    )
    startup_timeout_s: float = Field(60.0, gt=0, description="Wait for the SuperLink to answer.")
    superlink_retry_s: float = Field(
        600.0, gt=0,
        description="How long the ServerApp keeps retrying a SuperLink call that fails with "
        "a passing error (HTTP 5xx, a dropped connection, a locked database) before the round "
        "gives up on it.",
    )
    stall_s: float = Field(
        900.0, ge=10,
        description="ark-server restarts its SuperLink and resumes the run when the SuperLink "
        "has not answered its health check, or the ServerApp has made no call to it, for this "
        "long (both alive but stuck). Above the longest single push of the master.",
    )
    site_wait_s: float = Field(
        120.0, ge=0,
        description="Before each round, once min_sites are connected, wait up to this long for "
        "the other listed sites (they reconnect with back-off after a server restart). A listed "
        "site that is down costs this much per round.",
    )

    @field_validator("sites")
    @classmethod
    def _unique(cls, sites: list[SiteKey]) -> list[SiteKey]:
        return require_unique(sites, "site")


class SiteDeployment(Strict):
    """A hospital's side (``ark-client``)."""

    server: str = Field(description="host:port of the coordinator's site port.")
    ca_cert: Path = Field(description="The federation's ca.crt (verifies the server).")
    private_key: Path = Field(description="This site's private key from `ark keys` (0600).")
    gpus: list[int] | None = Field(
        None, description="GPU indices this site may use (CUDA_VISIBLE_DEVICES); [] hides all."
    )
    data_parallel: int | None = Field(
        None, ge=1,
        description="Processes that train each round together (torch DistributedDataParallel, "
        "one per GPU); train.batch_size stays the batch of a step, split over them. Unset: one "
        "per GPU in gpus, one process without gpus.",
    )
    launcher: list[str] | None = Field(
        None, min_length=1,
        description="A command that starts the ranks itself, such as [torchrun, --standalone, "
        "--nproc-per-node=4, --no-python] or, inside a Slurm job, [srun, --ntasks=4, "
        "--gpus-per-task=1]; the rank's own command (python -m client.rank ...) is appended. "
        "Unset: the ClientApp starts data_parallel ranks itself.",
    )
    trusted_entities: Path | None = Field(
        None,
        description="Flower --trusted-entities YAML: run only app bundles signed by these "
        "Ed25519 keys (apps published and reviewed on Flower Hub).",
    )
    startup_retries: int = Field(
        10, ge=1, description="Tries to reach the server before ark-client gives up at start."
    )
    retry_wait_s: float = Field(3.0, gt=0, description="Seconds between start-up tries.")
    rejoin_timeout_s: float = Field(
        3600.0, gt=0,
        description="After a SuperNode ended, how long ark-client keeps starting new ones "
        "(back-off up to 60 s) until one stays joined, before it gives up (exit code 4).",
    )
    runtime_port: int = Field(
        9094, ge=1, le=65535, description="Loopback port of the SuperNode's app runtime API."
    )

    @model_validator(mode="after")
    def _one_rank_per_gpu(self) -> SiteDeployment:
        if self.gpus and self.data_parallel and self.data_parallel > len(self.gpus):
            raise ValueError(f"data_parallel: {self.data_parallel} ranks for the "
                             f"{len(self.gpus)} GPUs in gpus {self.gpus}: one rank per GPU")
        return self

    @property
    def processes(self) -> int:
        """How many processes train a round: ``data_parallel``, else one per listed GPU."""
        return self.data_parallel or max(len(self.gpus or ()), 1)
