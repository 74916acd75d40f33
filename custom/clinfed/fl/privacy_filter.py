"""A hospital's last word on what leaves the site: model updates go out as CKKS ciphertexts or not at all.

The executor already refuses a plaintext job when the site's policy says `require_encryption`
(`clinfed.fl.executor`), before any training spends privacy budget. That guards clinfed's own
executor. This filter guards the *boundary*, whatever executor a job brings: it runs in the site's
FLARE privacy scope (`local/privacy.json`, a task-result filter FLARE applies to every result the
site sends, after the job's own filters), so a job cannot remove or reorder it.

What it lets through: results without model parameters (metrics, statistics, a refusal or an error
reply carry no weights), parameters that are CKKS ciphertexts (`clinfed.fl.payload`), and a stream
reference to ciphertexts (`clinfed.fl.streaming`) that this process offered and whose every item is
a SEAL-serialised object (the server pulls a stream after the filter ran, so the filter checks the
stream's source itself). Anything
else that carries weights, plaintext arrays or a format it cannot read, makes it raise FLARE's
`UnsafeJobError`: FLARE then drops the result, marks the job unsafe at this site (no further task
runs here) and the server, seeing UNSAFE_JOB, aborts the job.
"""

from __future__ import annotations

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.fl_exception import UnsafeJobError
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModelConst

from clinfed.fl import payload, streaming

WEIGHT_KINDS = (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF)


def plaintext_weights(dxo: DXO) -> str | None:
    """Why `dxo` must not leave the site (plaintext weights, and where), or None when it may."""
    kind = dxo.data_kind
    if kind in WEIGHT_KINDS:
        params = dxo.data or {}
    elif kind == DataKind.FL_MODEL:
        params = (dxo.data or {}).get(FLModelConst.PARAMS) or {}
    elif kind == DataKind.COLLECTION:
        for name, inner in (dxo.data or {}).items():
            reason = plaintext_weights(inner) if isinstance(inner, DXO) else None
            if reason:
                return f"{name}: {reason}"
        return None
    else:
        return None  # metrics, statistics, PSI, analytics: no model parameters
    if not params or payload.is_encrypted(params):
        return None
    if streaming.is_streamed(params):  # ciphertexts the server pulls later (clinfed.fl.streaming)
        return streaming.offered_ciphertexts(params)
    return f"{kind.value} holds {len(params)} plaintext layer(s)"


class RequireEncryptedUpdates(Filter):
    def __init__(self, tasks: list[str] | None = None):
        """
        Args:
            tasks: task names to check; None (the default) checks every task's result, since a job
                chooses its own task names.
        """
        super().__init__()
        self.tasks = set(tasks) if tasks else None

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        task = fl_ctx.get_prop(FLContextKey.TASK_NAME, "") or ""
        if self.tasks is not None and task not in self.tasks:
            return shareable
        site = fl_ctx.get_identity_name() or "site"
        try:
            dxo = from_shareable(shareable)
        except ValueError:
            if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
                return shareable  # an error reply: FLARE's own, it carries no data
            raise UnsafeJobError(
                f"{site}: privacy policy: the result of task '{task}' is not a DXO this site can inspect; "
                "only CKKS-encrypted model updates may leave"
            ) from None
        reason = plaintext_weights(dxo)
        if reason:
            message = (
                f"{site}: privacy policy: task '{task}' result {reason}; "
                "this site only releases CKKS-encrypted model updates"
            )
            self.log_error(fl_ctx, message)
            raise UnsafeJobError(message)
        return shareable
