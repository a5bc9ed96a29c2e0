"""The Flower app that `dce federate` submits to a SuperLink: its ServerApp and ClientApp components."""

from __future__ import annotations

import base64
import logging
import sys

from flwr.app import Context
from flwr.serverapp import Grid

from engine.errors import EngineError, user_message
from engine.federated.flower import ERROR_MARK, RUN_CONFIG, RUN_OUT, RUN_OVERWRITE, client_app, server_app

logger = logging.getLogger(__name__)


def _run_config_text(context: Context, key: str) -> str:
    return base64.b64decode(str(context.run_config[key])).decode()


def serve(grid: Grid, context: Context) -> None:
    """The ServerApp's main: `run_federated` of the submitted config over the SuperNodes' partitions."""
    from engine.config import PipelineConfig
    from engine.federated.run import run_federated

    cfg = PipelineConfig.model_validate_json(_run_config_text(context, RUN_CONFIG))
    try:
        result = run_federated(cfg, _run_config_text(context, RUN_OUT), grid=grid,
                               overwrite=bool(context.run_config[RUN_OVERWRITE]))
    except EngineError as e:
        # Bad input (a SuperNode's missing file, a partition too small): one marked line that `submit` finds in the
        # run's streamed log and raises in `dce federate` as the one `error:` line.
        print(f"{ERROR_MARK}{type(e).__name__}:{user_message(e)}", file=sys.stderr, flush=True)
        raise
    logger.info("dce federate: wrote %s", result.run_dir)


server = server_app(serve)
client = client_app()
