"""The web app over sweep results: ``wattscope serve`` (an interactive page) and ``wattscope report`` (the same
views in one self-contained HTML file).

payload.py builds the page's data from ``wattscope.analysis``; page.py inlines ``static/`` (index.html, app.css,
app.js: plain JavaScript and inline SVG, no framework, nothing fetched from the network) into one HTML page;
server.py serves it with the standard library; report.py writes it to a file; command.py registers the commands.
Needs pandas and scipy (``pip install 'wattscope[analysis]'``), imported on first use.
"""

from __future__ import annotations
