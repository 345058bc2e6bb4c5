#!/usr/bin/env bash
# The Debian Reference (Osamu Aoki, GPL-2+) in English, simplified and traditional Chinese, from
# Debian's own packages: DIR/{en,zh,zh-hant}/*.html, for bench/rag_real_docs.py and its test.
#   bash bench/debian_reference.sh [DIR]     (default: ~/.cache/ownllm/debian-reference)
set -euo pipefail
out="${1:-${OWNLLM_HOME:-$HOME/.cache/ownllm}/debian-reference}"
[ -f "$out/zh-hant/ch01.html" ] && exit 0
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
( cd "$tmp" && apt-get download -qq debian-reference-en debian-reference-zh-cn debian-reference-zh-tw )
for pair in en:en zh-cn:zh zh-tw:zh-hant; do
  pkg="${pair%%:*}"; lang="${pair##*:}"
  dpkg-deb -x "$tmp"/debian-reference-"$pkg"_*.deb "$tmp/$pkg"
  mkdir -p "$out/$lang.part"
  for f in "$tmp/$pkg"/usr/share/debian-reference/ch*."$pkg".html; do
    cp "$f" "$out/$lang.part/$(basename "$f" ."$pkg".html).html"
  done
  cp "$tmp/$pkg/usr/share/doc/debian-reference-$pkg/copyright" "$out/$lang.part/COPYRIGHT"
  rm -rf "${out:?}/$lang"; mv "$out/$lang.part" "$out/$lang"
done
echo "debian-reference: $(ls "$out"/*/ch*.html | wc -l) chapters in $out"
