"""Catalog errors. The API maps NotFound -> 404, InvalidState -> 409, InvalidArgument -> 400/422."""


class CatalogError(Exception):
    code = "catalog_error"


class NotFound(CatalogError, LookupError):
    code = "not_found"


class InvalidState(CatalogError):
    code = "conflict"


class InvalidArgument(CatalogError, ValueError):
    code = "invalid_argument"


class InvalidCursor(InvalidArgument):
    code = "invalid_cursor"
