"""The ground floor of DataFlex's multi-process work: which rank am I, and the cross-rank protocol.

Everything that issues a collective for a decision goes through :class:`dataflex.dist.agreement.Agreement`.
Nothing here imports another DataFlex package except :mod:`dataflex.errors`.
"""
