"""
Pure codecs for everything omerta puts on the wire.

Every module here turns bytes into values and back, with no I/O and no
clocks.  Decoders raise only L{ParseError}.
"""


class ParseError(ValueError):
    """
    Bytes that do not form a valid message.  The only exception a decoder in
    L{omerta.wire} raises.
    """
