"""Encrypted updates moved through FLARE's own download service, never whole in memory (issue 14).

FLARE sends a task result or a task's data as one message: however its cellnet cuts that message
into frames on the wire, the receiver assembles the whole of it, and FOBS then decodes it into a
second copy. For a 500 MB model that is 2 GB of ciphertexts per site held at once (and, at the
server, one such message per site of a 20-site round). FLARE 2.9 has the mechanism that avoids it:
its *download service* (`nvflare.fuel.f3.streaming.download_service`), which its own numpy/tensor
decomposers use for big arrays. A sender registers a `Downloadable` with an `ObjectDownloader` and
sends only a reference; the receiver pulls the object item by item (`download_object`), each
request answered with as many items as fit `STREAM_CHUNK_BYTES`, and a consumer sees each batch
as it arrives. We use exactly that, with two pieces of our own because the decomposers fall short:
they download a whole array before anyone can use it, where we want each ciphertext written to a
spool as it lands (so nothing holds the payload whole), and they cannot vet and *add* one site's
upload into the running sum ciphertext by ciphertext.

* `offer(cell, params, receivers)`: the payload's ciphertexts (a list, or a `Spool` on disk) become
  a `CiphertextSource`; the params then carry ``{"stream": {"source", "ref", "count"}}`` in place
  of the ciphertexts. The source serves each ciphertext straight from the list or the spool, with
  FLARE's chunk cache switched off: the bytes already exist, and a cache would keep every chunk a
  slow or dead receiver has not yet fetched.
* `receive(cell, params, spool_dir)`: pulls the referenced ciphertexts into a `Spool` (a private
  file, one ciphertext at a time) and returns the params with the spool in place of the list. The
  spool is a read-only `Sequence[bytes]`, so `EncryptedSum.add` vets it whole and then adds it one
  ciphertext at a time (`he.ckks.add_streamed`), and `decrypt_vector` decrypts it one at a time.

Memory then: a site holds its model and its update's spool *on disk*; the server holds the running
sum plus the download in flight (one request of `STREAM_CHUNK_BYTES` and FLARE's one pipelined
request ahead), and fetches the sites' uploads one after the other, never 20 at once.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from clinfed.fl import payload
from clinfed.textio import one_line

STREAM_KEY = "stream"
SEAL_MAGIC = b"\x5e\xa1"  # every SEAL-serialised object starts with its header's magic 0xA15E (LE)
STREAM_CHUNK_BYTES = int(os.environ.get("CLINFED_STREAM_CHUNK_BYTES", str(2 * 1024 * 1024)))
STREAM_IDLE_TIMEOUT = 3600.0  # seconds without a pull before a source is dropped (the server fetches
# uploads only once every site of the round has answered, so this must outlast a round)
REQUEST_TIMEOUT = 120.0  # seconds for one pull request


class StreamError(ValueError):
    """A stream that could not be fetched; the message is one line naming the sender."""


class Spool(Sequence[bytes]):
    """Ciphertexts on disk, appended one at a time and read back one at a time (random access).

    A private (0600) file in a private (0700) directory; `close()` deletes it. Ciphertexts are not
    secret without the key, but nothing needs to outlive the round, so nothing does.
    """

    def __init__(self, folder: str | Path | None = None, prefix: str = "clinfed-spool-"):
        self._dir = tempfile.mkdtemp(prefix=prefix, dir=str(folder) if folder else None)
        self.path = Path(self._dir) / "ciphertexts.bin"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._offsets: list[tuple[int, int]] = []
        self._end = 0
        self._lock = threading.Lock()

    def append(self, data: bytes) -> None:
        view = memoryview(data)
        with self._lock:
            os.pwrite(self._fd, view, self._end)
            self._offsets.append((self._end, view.nbytes))
            self._end += view.nbytes

    def extend(self, items: Iterator[bytes] | Sequence[bytes]) -> None:
        for item in items:
            self.append(item)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        offset, size = self._offsets[index]
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise StreamError(f"spool {self.path.name}: ciphertext {index} truncated on disk")
        return data

    def head(self, index: int, size: int) -> bytes:
        """The first ``size`` bytes of ciphertext ``index`` (a header check without reading it all)."""
        offset, length = self._offsets[index]
        return os.pread(self._fd, min(size, length), offset)

    def __iter__(self) -> Iterator[bytes]:
        for i in range(len(self)):
            yield self[i]

    @property
    def nbytes(self) -> int:
        return self._end

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            shutil.rmtree(self._dir, ignore_errors=True)

    def __del__(self) -> None:  # a forgotten spool must not fill the disk
        with contextlib.suppress(Exception):  # at interpreter shutdown os may be gone
            self.close()


@functools.cache
def _source_class():
    """`CiphertextSource` is built on FLARE's CacheableObject, imported only where FLARE runs."""
    from nvflare.fuel.f3.cellnet.fqcn import FQCN
    from nvflare.fuel.f3.streaming.cacheable import CacheableObject
    from nvflare.fuel.f3.streaming.download_service import ProduceRC

    class CiphertextSource(CacheableObject):
        """One payload's ciphertexts, served one item per ciphertext, with FLARE's chunk cache off,
        and only to the participants named in ``readers`` (FLARE's service answers any cell that
        presents the reference)."""

        def __init__(self, cts: Sequence[bytes], max_chunk_size: int, readers: frozenset[str], on_done=None):
            self._on_done, self._readers = on_done, readers
            super().__init__(cts, max_chunk_size)
            self.clear_cache()  # the bytes exist already: serve them, do not keep copies

        def produce(self, state: dict, requester: str):
            if FQCN.get_root(str(requester)) not in self._readers:
                # every site holds the federation's secret key: a site's own upload must reach the
                # server only, never another site that learnt (or was handed) the reference
                self.logger.error(f"refused a pull of a stream by {requester}: not one of {sorted(self._readers)}")
                return ProduceRC.ERROR, None, {}
            return super().produce(state, requester)

        def get_item_count(self) -> int:
            return len(self.base_obj)

        def produce_item(self, index: int) -> bytes:
            return bytes(self.base_obj[index])

        def get_item_size(self, index: int) -> int | None:
            return None

        def transaction_done(self, transaction_id: str, status: str):
            super().transaction_done(transaction_id, status)
            if self._on_done is not None:
                self._on_done()

    return CiphertextSource


def offer(cell: Any, params: dict, readers: Sequence[str], on_done=None, timeout: float = STREAM_IDLE_TIMEOUT) -> dict:
    """``params`` with its ciphertexts registered for download by the participants ``readers``
    ("server", or the round's sites), in their place a reference (``on_done`` runs when every reader
    has them, or the source timed out)."""
    from nvflare.fuel.f3.streaming.obj_downloader import ObjectDownloader

    cts = params[payload.CKKS_KEY]
    readers = frozenset(readers)
    downloader = ObjectDownloader(cell=cell, timeout=timeout, num_receivers=max(1, len(readers)))
    refs: list[str] = []

    def done() -> None:  # every reader has it, or it timed out or was withdrawn
        for r in refs:
            _downloaders.pop(r, None)
        if on_done is not None:
            on_done()

    source = _source_class()(cts, STREAM_CHUNK_BYTES, readers, done)
    ref = downloader.add_object(source)
    refs.append(ref)
    _offered[ref] = source
    _downloaders[ref] = downloader
    out = {k: v for k, v in params.items() if k != payload.CKKS_KEY}
    out[STREAM_KEY] = {"source": cell.get_fqcn(), "ref": ref, "count": len(cts)}
    return out


_offered: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()  # ref -> source, this process


_downloaders: dict[str, Any] = {}  # ref -> its ObjectDownloader, until withdrawn


def worth_streaming(cts: Sequence[bytes]) -> bool:
    """Stream a payload only when it takes more than one message anyway (as FLARE's own decomposers
    send small arrays inline): every stream leaves FLARE bookkeeping behind for up to 30 minutes
    (finished-transfer records, stream error contexts), a few KB a round that a 30 KB model's
    updates would otherwise pay every round for nothing."""
    size = cts.nbytes if isinstance(cts, Spool) else sum(len(c) for c in cts)
    return size > STREAM_CHUNK_BYTES


def into_memory(spool: Spool) -> list[bytes]:
    """A spool's ciphertexts as a list, the spool deleted: for a payload small enough to ride in one
    message (see `worth_streaming`), which FLARE then sends inline."""
    try:
        return list(spool)
    finally:
        spool.close()


def withdraw(params: dict | None) -> None:
    """End the stream ``params`` refer to (e.g. last round's global model once a new one is out): a
    receiver that never came must not keep its source, and the bytes it serves, for the idle timeout."""
    ref = str(((params or {}).get(STREAM_KEY) or {}).get("ref", ""))
    downloader = _downloaders.pop(ref, None)
    if downloader is not None:
        with contextlib.suppress(Exception):  # already finished or timed out: nothing to end
            downloader.delete_transaction()


def is_streamed(params: dict | None) -> bool:
    return bool(params) and isinstance(params.get(STREAM_KEY), dict)


def offered_ciphertexts(params: dict) -> str | None:
    """Why the stream ``params`` refer to must not leave (None when it may): the site's privacy filter
    cannot see inside a stream the server will pull later, so it checks here that the reference is
    one `offer` made in this process and that every item it serves is a SEAL-serialised object, a
    compact-format upload (`he.compact`) or a compressed one (`he.truncated`)."""
    ref = (params.get(STREAM_KEY) or {}).get("ref")
    source = _offered.get(str(ref)) if ref else None
    if source is None:
        return "refers to a stream clinfed did not offer"
    cts = source.base_obj
    if cts is None:
        return "refers to a stream already released"
    from clinfed.he.compact import UPLOAD_HEAD, is_compact_upload
    from clinfed.he.truncated import is_truncated_upload

    for i in range(len(cts)):
        head = cts.head(i, len(UPLOAD_HEAD)) if isinstance(cts, Spool) else bytes(cts[i][: len(UPLOAD_HEAD)])
        if not (head.startswith(SEAL_MAGIC) or is_compact_upload(head) or is_truncated_upload(head)):
            return f"streams item {i + 1} of {len(cts)}, which is not a SEAL or compact-format ciphertext"
    return None


@functools.cache
def _sink_class():
    from nvflare.fuel.f3.streaming.cacheable import ItemConsumer

    class SpoolSink(ItemConsumer):
        """Writes each arriving ciphertext to the spool; counts the messages it took."""

        def __init__(self, spool: Spool, limit: int):
            super().__init__()
            self.spool, self.limit, self.messages = spool, limit, 0

        def consume_items(self, items: list, result: Any) -> Any:
            self.messages += 1
            for item in items:
                if len(self.spool) >= self.limit:
                    raise StreamError(f"sent more than the {self.limit} ciphertexts it announced")
                if not isinstance(item, bytes | bytearray | memoryview):
                    raise StreamError(f"sent a {type(item).__name__} where a ciphertext belongs")
                self.spool.append(item)
            return result

    return SpoolSink


def receive(
    cell: Any, params: dict, sender: str, spool_dir: str | Path | None = None, abort_signal=None
) -> tuple[dict, dict]:
    """Pull a streamed payload into a spool: (params with the spool as its ciphertexts, transfer stats).

    Raises StreamError (one line naming ``sender``) for a malformed reference, a failed download or
    a count other than announced; the spool is then deleted.
    """
    from nvflare.fuel.f3.streaming.download_service import download_object

    ref = params.get(STREAM_KEY)
    try:
        source, ref_id, count = str(ref["source"]), str(ref["ref"]), int(ref["count"])
    except (TypeError, KeyError, ValueError) as exc:
        raise StreamError(f"{sender}: malformed stream reference ({one_line(exc)})") from exc
    if count < 1:
        raise StreamError(f"{sender}: stream announces {count} ciphertexts")
    spool = Spool(spool_dir)
    sink = _sink_class()(spool, count)
    try:
        download_object(
            from_fqcn=source,
            ref_id=ref_id,
            per_request_timeout=REQUEST_TIMEOUT,
            cell=cell,
            consumer=sink,
            abort_signal=abort_signal,
        )
        if sink.error:
            raise StreamError(f"{sender}: stream failed: {one_line(sink.error)}")
        if len(spool) != count:
            raise StreamError(f"{sender}: stream ended after {len(spool)} of {count} ciphertexts")
    except Exception:
        spool.close()
        raise
    out = {k: v for k, v in params.items() if k != STREAM_KEY}
    out[payload.CKKS_KEY] = spool
    return out, {"bytes": spool.nbytes, "messages": sink.messages, "ciphertexts": count}


def release(params: dict | None) -> None:
    """Delete a received payload's spool (call once it has been added or decrypted)."""
    cts = (params or {}).get(payload.CKKS_KEY)
    if isinstance(cts, Spool):
        cts.close()
