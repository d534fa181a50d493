# Sourced by scripts/study-data-rich.sh and scripts/study-data-rich-gpu.sh: the study's C sources.
# `linux_c_sources DIR` installs Debian's linux-source-6.1 at $VERSION if it is missing (another
# installed version is refused: the corpus's fingerprint would differ) and extracts every .c file of at
# most 200,000 bytes into DIR/linux-source-6.1.
VERSION=${VERSION:-6.1.192-3}

linux_c_sources() {
    if [ ! -f /usr/src/linux-source-6.1.tar.xz ]; then
        apt-get update -qq
        apt-get install -y -q "linux-source-6.1=$VERSION"
    fi
    local installed
    installed=$(dpkg-query -W -f='${Version}' linux-source-6.1)
    [ "$installed" = "$VERSION" ] || { echo "error: linux-source-6.1 $installed is installed, the study's corpus is $VERSION" >&2; exit 1; }
    tar -xJf /usr/src/linux-source-6.1.tar.xz -C "$1" --wildcards '*.c'
    find "$1" -name '*.c' -size +200000c -delete
}
