"""MkDocs hook: the reST markup of the docstrings shown as plain Markdown would show it.

The docstrings cross-reference with Sphinx roles (``:func:`run```, ``:class:`~a.b.C```) and
end a paragraph before a literal block with ``::``; mkdocstrings renders them as text. This
drops the role names (``~a.b.C`` shows as ``C``, Sphinx's meaning) and the doubled colon.
"""

import re

_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):<code>(~)?([^<]*)</code>")
_LITERAL_MARK = re.compile(r"::</p>")


def _code(match):
    name = match.group(2)
    return f"<code>{name.rsplit('.', 1)[-1] if match.group(1) else name}</code>"


def on_page_content(html, page, config, files):
    return _LITERAL_MARK.sub(":</p>", _ROLE.sub(_code, html))
