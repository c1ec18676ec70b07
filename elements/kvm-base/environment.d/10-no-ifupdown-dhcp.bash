# systemd-networkd does DHCP (static/etc/systemd/network/80-dhcp.network): no
# ifupdown eth0/eth1 DHCP stanzas from DIB's debootstrap element.
export DIB_APT_MINIMAL_CREATE_INTERFACES=0
