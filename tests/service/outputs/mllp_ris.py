"""hl7apy's own MLLP server as the RIS of the HL7 tests."""

from __future__ import annotations

import threading

from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message

from tests.conftest import free_port
from tests.tiers import requires


class Ris:
    """hl7apy's MLLP server on a port of its own, answering each ORU^R01 with the ACK code a test sets."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[str] = []
        self.code = "AA"
        self.server: MLLPServer | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        requires("peers")
        ris = self

        class Handler(AbstractHandler):
            def reply(self) -> str:
                incoming = parse_message(self.incoming_message, find_groups=False)
                ris.received.append(self.incoming_message)
                ack = Message("ACK", version="2.5.1")
                ack.msh.msh_3, ack.msh.msh_4 = "RIS", "HOSPITAL"
                ack.msh.msh_9 = "ACK^R01^ACK"
                ack.msh.msh_10 = f"ack{len(ris.received)}"
                ack.msh.msh_11 = "P"
                ack.msa.msa_1 = ris.code
                ack.msa.msa_2 = incoming.msh.msh_10.value
                if ris.code != "AA":
                    ack.msa.msa_3 = "order not on file" if ris.code == "AE" else "database locked, try later"
                return f"\x0b{ack.to_er7()}\r\x1c\r"

        self.server = MLLPServer("127.0.0.1", self.port, {"ORU^R01^ORU_R01": (Handler,)}, timeout=5)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def destination(self) -> str:
        return f"mllp://127.0.0.1:{self.port}"
