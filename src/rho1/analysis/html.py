"""The page shell every HTML output shares: one self-contained file, a Content-Security-Policy that allows
no script and no network request, plots as data URIs, everything escaped by jinja2's autoescape."""

from __future__ import annotations

import jinja2
from markupsafe import Markup

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
.tokens { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.7; font-size: 13px;
          border: 1px solid #ddd; padding: 0.8em; border-radius: 4px; }
.tokens span { unicode-bidi: isolate; }
.columns { display: grid; gap: 1em; }
.selected { background: #cfe0ff; color: #0b3d91; }
.unselected { color: #666; }
.l0 { color: #0b3d91; font-weight: 600; } .l1 { color: #5b8fd9; } .l2 { color: #111; }
.l3 { color: #f0a050; } .l4 { color: #c04a00; font-weight: 600; }
.ctrl { border: 1px dotted #999; font-size: 10px; color: #a00; }
table { border-collapse: collapse; margin: 0.6em 0; } td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
.legend span { padding: 0 0.4em; margin-right: 0.5em; }
"""

PAGE = jinja2.Template("""\
<!doctype html>
<html><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{{ csp }}">
<title>{{ title }}</title><style>{{ style }}</style></head>
<body><h1>{{ title }}</h1>
{{ body }}
</body></html>
""", autoescape=True)


def render_page(title: str, body_html: str, style: str = "") -> str:
    """A self-contained page around fragments our own templates made (and escaped)."""
    return PAGE.render(title=title, body=Markup(body_html), style=Markup(STYLE + style), csp=CSP)
