# Space-separated OVS bridges, each NAME or NAME:UPLINK; empty for none (the
# pipeline sets it from the spec's `bridges`).
export DIB_OVS_BRIDGES=${DIB_OVS_BRIDGES-br-int}
