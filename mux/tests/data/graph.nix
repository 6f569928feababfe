let
  sh = body: name: deps: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" ("PATH=/usr/bin:/bin; " + body) ];
    inherit deps;
  };
  src = builtins.toFile "graph-src" "source text\n";
  leaf = i: sh "echo leaf ${toString i} $(cat ${src}) > $out" "leaf-${toString i}" [];
  leaves = map leaf [ 1 2 3 4 5 6 ];
  big = sh "head -c 52428800 /dev/urandom > $out" "big-output" [];
  mid1 = sh "cat $deps > $out" "mid-1" (builtins.genList (i: builtins.elemAt leaves i) 3);
  mid2 = sh "cat $deps > $out; wc -c < ${big} >> $out" "mid-2" [ (builtins.elemAt leaves 3) big ];
  mid3 = sh "mkdir $out; for d in $deps; do cp $d $out/$(basename $d); done" "mid-3" [ mid1 mid2 (builtins.elemAt leaves 4) ];
in sh "echo top > $out; ls ${mid3} >> $out; cat ${builtins.elemAt leaves 5} >> $out" "top" [ mid3 ]
