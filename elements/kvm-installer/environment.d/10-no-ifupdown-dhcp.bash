# systemd-networkd configures the boot NIC from the kernel's ip= (systemd-network-generator):
# no ifupdown eth0/eth1 DHCP stanzas from DIB's debootstrap element.
export DIB_APT_MINIMAL_CREATE_INTERFACES=0
