# Floating content-addressed derivations for nixmux's resolution tests (Nix 2.8.0).
let
  mk = extra: name: deps: derivation ({
    inherit name;
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = ["-c" "echo ${name} ${toString deps} > $out"];
  } // extra);
  ca = mk {
    __contentAddressed = true;
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
  };
  a = ca "ca-a" [];
  b = ca "ca-b" [a];
  # Input-addressed, but deferred: its input's output path is not known in advance.
  c = mk {} "ca-c" [b];
in { inherit a b c; }
