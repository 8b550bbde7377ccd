"""A Google Cloud Storage server on loopback for the ``gs://`` tests: gcp-storage-emulator
(pure Python, in the dev extra) with the part of GCS's XML API that object_store (obstore's
``GCSStore``) speaks and the emulator lacks, added here.

object_store reads and writes objects through the XML API, ``{base}/{bucket}/{key}``, and
lists with ``GET {base}/{bucket}?list-type=2``. gcp-storage-emulator 2026.7.19 answers only a
plain GET and PUT there, and obstore refuses both answers (``ETag Header missing``,
``Last-Modified Header missing``); HEAD, DELETE and listing get ``501 Not Implemented``, and a
PUT with ``x-goog-if-generation-match`` (a conditional write: the writer lease) is stored
whatever the object's generation. :func:`start` routes those requests to the handlers below,
which serve the emulator's own stored objects: the headers object_store needs (``ETag``,
``Last-Modified``, ``x-goog-generation``), HEAD, DELETE, a ``ListBucketResult`` (one page: no
continuation tokens) and ``412 Precondition Failed`` where the generation does not match.

obstore is pointed at the server the way object_store documents for an emulator, without any
mfcache code: a service-account key holding ``gcs_base_url`` and ``"disable_oauth": true``
(placeholders for its secrets) in ``GOOGLE_SERVICE_ACCOUNT_KEY``, and ``GOOGLE_ALLOW_HTTP``."""

import json
import re
from datetime import UTC, datetime
from email.utils import format_datetime
from http import HTTPStatus
from xml.sax.saxutils import escape

from gcp_storage_emulator import server as emulator
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_OBJECT = r"^/(?P<bucket_name>[^/?]+)/(?P<object_id>.+)$"  # the bucket and key, percent-encoded
_BUCKET = r"^/(?P<bucket_name>[^/?]+)$"


def _stored(storage, request) -> dict | None:
    try:
        return storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
        return None


def _meta_headers(response, obj: dict) -> None:
    updated = datetime.strptime(obj["updated"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    response["ETag"] = f'"{obj["md5Hash"]}"'
    response["Last-Modified"] = format_datetime(updated, usegmt=True)
    response["x-goog-generation"] = obj["generation"]


def _get(request, response, storage, *args, **kwargs):
    obj = _stored(storage, request)
    if obj is None:
        response.status = HTTPStatus.NOT_FOUND
        return
    objects.download(request, response, storage)
    _meta_headers(response, obj)


def _put(request, response, storage, *args, **kwargs):
    wanted = request.get_header("x-goog-if-generation-match")
    if wanted is not None:
        obj = _stored(storage, request)
        if (obj["generation"] if obj else "0") != wanted:
            _ = request.data  # read the body, so the connection is left clean
            response.status = HTTPStatus.PRECONDITION_FAILED
            return
    objects.xml_upload(request, response, storage)
    if response.status == HTTPStatus.OK:
        _meta_headers(response, _stored(storage, request))


def _delete(request, response, storage, *args, **kwargs):
    objects.delete(request, response, storage)
    if response.status == HTTPStatus.OK:
        response.status = HTTPStatus.NO_CONTENT


def _list(request, response, storage, *args, **kwargs):
    query = {key: values[0] for key, values in request.query.items()}
    try:
        found, prefixes = storage.get_file_list(
            request.params["bucket_name"], query.get("prefix") or None, query.get("delimiter") or None
        )
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return
    parts = ["<?xml version='1.0' encoding='UTF-8'?><ListBucketResult>"]
    for obj in found:
        parts.append(
            f"<Contents><Key>{escape(obj['name'])}</Key><LastModified>{obj['updated']}</LastModified>"
            f'<Size>{obj["size"]}</Size><ETag>"{obj["md5Hash"]}"</ETag></Contents>'
        )
    parts += [f"<CommonPrefixes><Prefix>{escape(prefix)}</Prefix></CommonPrefixes>" for prefix in prefixes]
    parts.append("</ListBucketResult>")
    response.write_file("".join(parts), content_type="application/xml")


def _head(handler) -> None:
    request = emulator.Request(handler, "HEAD")
    match = re.fullmatch(_OBJECT, request.path)
    obj = None
    if match:
        request.set_match(match)
        obj = _stored(handler.storage, request)
    handler.send_response(HTTPStatus.OK if obj else HTTPStatus.NOT_FOUND)
    if obj:
        response = emulator.Response(handler)
        _meta_headers(response, obj)
        for key, value in response._headers.items():
            handler.send_header(key, value)
    handler.send_header("Content-Length", str(obj["size"] if obj else 0))  # no body follows
    handler.end_headers()


def _add_xml_api() -> None:
    if getattr(emulator, "_mfcache_xml_api", False):
        return
    public = r"^/(?P<bucket_name>"  # the emulator's own public-download route, replaced
    emulator.HANDLERS = tuple(route for route in emulator.HANDLERS if not route[0].startswith(public)) + (
        (_BUCKET, {emulator.GET: _list}),
        (_OBJECT, {emulator.GET: _get, emulator.PUT: _put, emulator.DELETE: _delete}),
    )
    emulator.RequestHandler.do_HEAD = _head
    emulator._mfcache_xml_api = True


def start(bucket: str):
    """The server (``.stop()`` it) holding an empty ``bucket``, and the environment that points
    obstore's ``GCSStore`` at it."""
    _add_xml_api()
    server = emulator.create_server("127.0.0.1", 0, in_memory=True, default_bucket=bucket)
    server.start()
    port = server._api._httpd.server_address[1]
    key = {
        "gcs_base_url": f"http://127.0.0.1:{port}",
        "disable_oauth": True,
        "client_email": "emulator@example.invalid",
        "private_key": "",
        "private_key_id": "",
    }
    return server, {"GOOGLE_SERVICE_ACCOUNT_KEY": json.dumps(key), "GOOGLE_ALLOW_HTTP": "true"}
