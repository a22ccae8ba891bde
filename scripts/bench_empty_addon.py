"""An addon that does nothing, for the proxy bench's ceiling (``scripts/bench``).

It has the per-flow hooks fp-tap has, each empty: what any script addon with those
hooks costs mitmdump (mitmproxy's dispatch of each hook to it) before it does any work.
The proxy section runs it as one more scenario next to no addon, so that fp-tap's ratio
can be read against what no addon of this shape can beat on the same machine.
"""

from __future__ import annotations

from mitmproxy import http


class Empty:
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        pass

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        pass

    def error(self, flow: http.HTTPFlow) -> None:
        pass

    def response(self, flow: http.HTTPFlow) -> None:
        pass


addons = [Empty()]
