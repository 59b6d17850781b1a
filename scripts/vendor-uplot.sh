#!/usr/bin/env bash
# Refresh the DSO console's vendored uPlot from the npm registry (never a CDN): the minified IIFE build, its
# stylesheet and its licence into dso_console/static/vendor/. Usage: scripts/vendor-uplot.sh [VERSION] (1.6.32).
# Prints the sha256 of the tarball and of each file, for the table in docs/dso-console.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
version="${1:-1.6.32}"
dest=dso_console/static/vendor
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
tgz="$work/uplot-$version.tgz"
if command -v npm >/dev/null; then
    (cd "$work" && npm pack --silent "uplot@$version" >/dev/null)
else
    curl -fsSL -o "$tgz" "https://registry.npmjs.org/uplot/-/uplot-$version.tgz"
fi
# The registry's own record of the tarball (sha512, base64): a tarball that does not match is not used.
expected="$(curl -fsSL "https://registry.npmjs.org/uplot/$version" | python3 -c 'import json, sys; print(json.load(sys.stdin)["dist"]["integrity"])')"
actual="sha512-$(openssl dgst -sha512 -binary "$tgz" | base64 -w0)"
if [ "$expected" != "$actual" ]; then
    echo "vendor-uplot: uplot-$version.tgz does not match the registry's integrity ($expected)" >&2
    exit 1
fi
tar -xzf "$tgz" -C "$work"
cp "$work/package/dist/uPlot.iife.min.js" "$work/package/dist/uPlot.min.css" "$dest/"
cp "$work/package/LICENSE" "$dest/uPlot-LICENSE"
echo "uplot $version from the npm registry into $dest:"
sha256sum "$tgz" "$dest/uPlot.iife.min.js" "$dest/uPlot.min.css" | sed "s|$work/||"
