from twisted.application.service import ServiceMaker

omertaRelay = ServiceMaker(
    "omerta relay", "omerta.app.relay_tap", "An omerta relay node.", "omerta-relay"
)
omertaProvider = ServiceMaker(
    "omerta provider", "omerta.app.provider_tap", "An omerta provider node.", "omerta-provider"
)
omertaNode = ServiceMaker(
    "omerta node", "omerta.app.node_tap", "An omerta member node.", "omerta-node"
)
