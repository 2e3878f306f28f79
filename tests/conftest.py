"""Shared fixtures: small networks whose maps can be derived by hand or checked against captum, and a
throwaway PostgreSQL server for the study's database tests."""

from __future__ import annotations

import importlib
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

#: Set by .ci/run: there a test that needs a missing module or tool fails instead of skipping.
REQUIRE_ALL = "GRADCAM_REQUIRE_ALL"


def require(name: str, reason: str, *, tool: bool = False) -> Any:
    """The module ``name``, imported, or with ``tool=True`` the path of the program ``name`` (on PATH, or
    an absolute path). When it is missing the calling test (or, at module level, the whole module) is
    skipped with ``reason``, unless ``GRADCAM_REQUIRE_ALL=1``: then it fails, so that CI cannot pass with
    a part of the suite silently left out."""
    if tool:
        found: Any = shutil.which(name)
        problem = f"{name} not found" if found is None else None
    else:
        try:
            found, problem = importlib.import_module(name), None
        except ImportError as error:
            found, problem = None, f"cannot import {name}: {error}"
    if problem is None:
        return found
    if os.environ.get(REQUIRE_ALL) == "1":
        pytest.fail(f"{reason}; {problem}, and {REQUIRE_ALL}=1 makes that a failure", pytrace=False)
    pytest.skip(f"{reason} ({problem})", allow_module_level=True)


class TinyHead(nn.Module):
    """x -> conv (the explained layer) -> [in-place ReLU] -> global average pool -> linear."""

    def __init__(self, channels: int = 4, classes: int = 3, inplace_relu: bool = False, relu: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.relu = nn.ReLU(inplace=inplace_relu) if relu else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


class GuidedRule(torch.autograd.Function):
    """relu forward; backward passes relu(R) only where the input was positive: Guided Backpropagation's
    rule (Springenberg et al. 2015), written out for the tests' references."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        return grad.clamp_min(0) * (x > 0)


class SpatialHead(nn.Module):
    """conv (explained) -> ReLU -> 1x1 conv -> position-weighted sum -> linear: gradients vary by position."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.mix = nn.Conv2d(5, 6, 1)
        self.register_buffer("where", torch.rand(1, 1, 6, 7))
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((torch.relu(self.mix(torch.relu(self.conv(x)))) * self.where).sum(dim=(2, 3)))

    def reference(self, x: torch.Tensor, targets: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """A = conv(x) and G = dS^c/dA by plain autograd, as numpy arrays (B,K,h,w)."""
        activations = F.conv2d(x, self.conv.weight, self.conv.bias, padding=1).detach().requires_grad_(True)
        head = (torch.relu(self.mix(torch.relu(activations))) * self.where).sum(dim=(2, 3))
        scores = self.fc(head)[torch.arange(len(targets)), targets]
        (gradients,) = torch.autograd.grad(scores.sum(), activations)
        return activations.detach().numpy(), gradients.numpy()


def tiny_classifier(name: str, device: str | None = None) -> Any:
    """A stand-in for ``models.load`` (a ModelPool's or ServeSettings' ``loader``): a
    :class:`TinyHead` on 32x32 inputs with classes cat, dog, fish, the same weights under every name,
    so two of them always agree on an image (as a study's stronger and weaker model must)."""
    from gradcam.models import LoadedModel
    from gradcam.models.base import Preprocess

    generator = torch.Generator().manual_seed(0)
    module = TinyHead()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    preprocess = Preprocess(resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    return LoadedModel(name, module.eval(), preprocess, ["cat", "dog", "fish"])


def new_rater(store: Any, study_id: str) -> str:
    """The id of a new invited rater of a study in ``store`` (a StudyStore)."""
    return store.invite(study_id)[0].rater


def tiny_vit_options(**overrides: object) -> dict[str, object]:
    """The small Hugging Face ViT/DeiT config the transformer tests share (2 layers, 2 heads, width 32);
    ``overrides`` set the image and patch size, labels, attention implementation."""
    options: dict[str, object] = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=3,
    )
    return {**options, **overrides}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for tests of tiny networks: with several, synchronisation costs more than the
    arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_gradcam(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The ``gradcam`` command in a real subprocess (wide columns, so rich does not wrap its output)."""
    return subprocess.run(
        [sys.executable, "-m", "gradcam", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


def _missing(reason: str) -> None:
    """Skip the calling test with ``reason``, or fail it under ``GRADCAM_REQUIRE_ALL=1`` (as :func:`require`
    does for a missing module or tool)."""
    if os.environ.get(REQUIRE_ALL) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_ALL}=1 makes that a failure", pytrace=False)
    pytest.skip(reason)


#: Where Debian installs PostgreSQL's server programs, one folder per major version
#: (.ci/install-postgresql installs them).
POSTGRES_LIB = Path("/usr/lib/postgresql")
#: The zone the test server runs in: not UTC, so that a timestamp read back in the server's zone shows.
POSTGRES_TIMEZONE = "Asia/Kathmandu"


def postgres_programs() -> Path | None:
    """The folder of the newest PostgreSQL server programs (initdb, pg_ctl): Debian's, else any initdb on
    PATH; None when there is none."""
    debian = [p.parent for p in POSTGRES_LIB.glob("*/bin/initdb") if p.parent.parent.name.isdigit()]
    if debian:
        return max(debian, key=lambda p: int(p.parent.name))
    found = shutil.which("initdb")
    return Path(found).parent if found else None


class PostgresServer:
    """A PostgreSQL cluster of its own in a temporary folder: listening only on a Unix socket there (no
    TCP), trust authentication for the superuser ``postgres`` (the socket's folder is open to its owner
    only), fsync off (nothing in it outlives the session). Run as root, the cluster runs as the
    ``postgres`` user, which owns the folder (PostgreSQL refuses to run as root).

    :meth:`new_database` makes an empty database and gives its SQLAlchemy URL
    (``postgresql+psycopg://postgres@/<name>?host=<socket folder>``), so each test has a database of its
    own; any process on this machine can use the URL (two services sharing one database, say)."""

    def __init__(self, programs: Path, base: Path) -> None:
        self.programs, self.base = programs, base
        self.data, self.socket, self.log = base / "data", base / "socket", base / "server.log"
        self._names = itertools.count(1)
        self._as_owner: list[str] = []
        if os.geteuid() == 0:
            import pwd

            owner = pwd.getpwnam("postgres")
            self._as_owner = [shutil.which("runuser") or "/usr/sbin/runuser", "-u", "postgres", "--"]
            os.chown(base, owner.pw_uid, owner.pw_gid)
        self.socket.mkdir(mode=0o700)
        if self._as_owner:
            os.chown(self.socket, owner.pw_uid, owner.pw_gid)

    def _run(self, program: str, *args: str, timeout: float = 60) -> None:
        command = [*self._as_owner, str(self.programs / program), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=self._env())
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{program} {' '.join(args)} failed: {done.stderr.strip()}\n{log}")

    def _env(self) -> dict[str, str]:
        return {**os.environ, "LC_ALL": "C", "LANG": "C"}

    def _pg_ctl(self, action: str, *args: str) -> None:
        """pg_ctl ``action``, waiting (at most a minute) until it is done."""
        where = ("-D", str(self.data), "-l", str(self.log))
        self._run("pg_ctl", action, *where, "-w", "-t", "60", *args, timeout=90)

    def start(self) -> None:
        """initdb, then start the server and wait until it accepts connections."""
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")  # fmt: skip
        settings = {
            "listen_addresses": "''",
            "unix_socket_directories": f"'{self.socket}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "timezone": f"'{POSTGRES_TIMEZONE}'",
        }
        with (self.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        self._pg_ctl("start")

    def restart(self) -> None:
        """Stop the server (dropping every connection) and start it again."""
        self._pg_ctl("restart", "-m", "fast")

    def stop(self) -> None:
        """Stop the server if it runs (fast: connections are cut; else immediate)."""
        if not (self.data / "postmaster.pid").exists():
            return
        try:
            self._pg_ctl("stop", "-m", "fast")
        except (RuntimeError, subprocess.TimeoutExpired):
            self._pg_ctl("stop", "-m", "immediate")

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of ``database`` on this server (psycopg 3, over the Unix socket)."""
        return f"postgresql+psycopg://postgres@/{database}?host={self.socket}"

    def new_database(self) -> str:
        """A new, empty database (``test_1``, ``test_2``, ...); its URL."""
        import psycopg

        name = f"test_{next(self._names)}"
        with psycopg.connect(host=str(self.socket), user="postgres", dbname="postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server for the session (started on first use, stopped and removed at the
    end, also after failures). Missing PostgreSQL or psycopg skips the test, and fails it under
    GRADCAM_REQUIRE_ALL=1 (CI: .ci/install-postgresql installs the server, the test extra psycopg)."""
    require("psycopg", "the PostgreSQL tests need psycopg 3 (pip install 'psycopg[binary]')")
    programs = postgres_programs()
    why = "the PostgreSQL tests need PostgreSQL's server programs (.ci/install-postgresql)"
    initdb = Path(require(str(programs / "initdb") if programs else "initdb", why, tool=True))
    if os.geteuid() == 0:
        import pwd

        runuser = shutil.which("runuser") or "/usr/sbin/runuser"  # root's PATH may lack sbin
        require(runuser, "the PostgreSQL tests run the server as the postgres user with runuser", tool=True)
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            _missing("the PostgreSQL tests run the server as the postgres user (Debian's package makes it)")
    # A short folder of its own (pytest's may be long: a socket's path has at most 107 bytes; and
    # root's is closed to the postgres user).
    base = Path(tempfile.mkdtemp(prefix="gradcam-pg-"))
    try:
        server = PostgresServer(initdb.parent, base)
        try:
            server.start()
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The SQLAlchemy URL of a new, empty database on the session's PostgreSQL server."""
    return postgres_server.new_database()
