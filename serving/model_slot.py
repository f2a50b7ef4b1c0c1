"""The generator a replica serves: loaded from the MLflow registry (``models:/NAME@ALIAS`` or a pinned version), the
alias re-resolved in the background every ``model_poll_s``, a new version swapped in whole. Each batch reads
`ModelSlot.current` once, so a switch is atomic per batch and every result names the version that produced it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ipsr_platform import tracking
from ipsr_platform.config import ServeConfig
from ipsr_platform.models import parse_model_uri

log = logging.getLogger("ipsr.serve")


@dataclass
class Loaded:
    """A generator and where it came from; replaced as a whole, never mutated."""

    module: Any
    name: str
    version: str
    alias: str | None
    identity_net_sha256: str | None
    run_id: str | None
    loaded_at: float = field(default_factory=time.time)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "alias": self.alias,
            "run_id": self.run_id,
            "identity_net_sha256": self.identity_net_sha256,
            "loaded_at": self.loaded_at,
        }


class ModelSlot:
    """``uri`` and the generator loaded from it (``current``); ``swap_lock``: one load at a time, so the poll and a
    reconfigure never interleave."""

    def __init__(self, cfg: ServeConfig, device: torch.device, tracking_uri: str, identity_net_sha256: str):
        self.cfg = cfg
        self.device = device
        self.tracking_uri = tracking_uri
        self.identity_net_sha256 = identity_net_sha256  # the replica's FaceNet, to compare with a model's tag
        self.uri = cfg.generator
        self.current: Loaded = self._load(self.uri)
        self.swap_lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._poll, name="ipsr-model-poll", daemon=True).start()

    def _load(self, uri: str, version: str | None = None) -> Loaded:
        """Load ``uri``; ``version``: the version its alias was just resolved to (loaded as such: one registry
        lookup, and no race with an alias that moves in between)."""
        from ipsr_platform.models import load_generator

        name, alias, _ = parse_model_uri(uri)
        # pt2 (torch.export) only, unless --allow-pickle-models: unpickling runs code stored with the model.
        loaded = load_generator(
            f"models:/{name}/{version}" if version else uri,
            self.tracking_uri,
            allow_pickle=self.cfg.allow_pickle_models,
        )
        sha = loaded.tags.get(tracking.TAG_IDENTITY_NET)
        if sha and sha != self.identity_net_sha256:
            log.warning(
                "model %s/%s was trained against identity net %s…, serving with %s…",
                name,
                loaded.version,
                sha[:12],
                self.identity_net_sha256[:12],
            )
        log.info("serving %s version %s", uri, loaded.version)
        return Loaded(loaded.module.to(self.device), name, str(loaded.version), alias, sha, loaded.run_id)

    def _poll(self) -> None:
        """Every ``model_poll_s``: resolve the alias again and swap in a new version (one attribute assignment:
        atomic per batch)."""
        while not self._stop.wait(self.cfg.model_poll_s):
            try:
                with self.swap_lock:
                    name, alias, _ = parse_model_uri(self.uri)
                    if alias:
                        version = str(tracking.version_for_alias(name, alias, self.tracking_uri).version)
                        if version != self.current.version or name != self.current.name:
                            self.current = self._load(self.uri, version=version)
            except Exception:  # noqa: BLE001 - the registry may be briefly unreachable: keep the current model
                log.exception("model refresh failed; still serving version %s", self.current.version)

    def pin(self, uri: str | None) -> None:
        """Serve ``uri`` (``user_config``'s ``generator``); None: the deployment's configured generator again."""
        uri = uri or self.cfg.generator
        if uri != self.uri:
            with self.swap_lock:
                self.uri = uri
                self.current = self._load(uri)

    def stop(self) -> None:
        self._stop.set()
