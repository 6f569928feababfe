let
  system = "x86_64-linux";
  plain = derivation {
    name = "plain";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" "echo hello > $out" ];
  };
  multi = derivation {
    name = "multi-out";
    inherit system;
    builder = "/bin/sh";
    outputs = [ "out" "dev" "doc" ];
    args = [ "-c" "echo o > $out; echo d > $dev; echo x > $doc" ];
  };
  fixedFlat = derivation {
    name = "fixed-flat";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" "printf abc > $out" ];
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
  };
  fixedRec = derivation {
    name = "fixed-recursive";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" "mkdir $out" ];
    outputHashMode = "recursive";
    outputHash = "sha512-3a81oZNherrMQXNJriBBMRLm+k6JqX6iCp7u5ktV05ohkpkqJ0/BqDa6PCOj/uu9RU1EI2Q86A4qmslPpUyknw==";
  };
  fixedSha1 = derivation {
    name = "fixed-sha1";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" "printf abc > $out" ];
    outputHashAlgo = "sha1";
    outputHash = "a9993e364706816aba3e25717850c26c9cd0d89d";
  };
  floating = derivation {
    name = "floating-ca";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" "echo ca > $out" ];
    __contentAddressed = true;
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
  };
  impure = derivation {
    name = "impure";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" "date > $out" ];
    __impure = true;
  };
  escapes = derivation {
    name = "escapes";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" "printf '%s\\n' \"$quoted\" > $out" "tab\there" "back\\slash" "cr\rlf\n" ];
    quoted = "she said \"hi\" and left";
    multiline = ''
      line one
        indented "two"
      back\slash \\ double
      $dollar ''${interp}
    '';
    backslashes = "\\ \\\\ \\n \\\" end\\";
    controls = "tab\tcr\rnl\nend";
    unicode = "ünïcödé ✓ 日本";
    "weird key\"\\" = "v";
    empty = "";
  };
  withInputs = derivation {
    name = "with-inputs";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" "cat ${plain} ${multi.dev} ${multi} ${./src.txt} ${builtins.toFile "inline.txt" "inline\n"} > $out" ];
    fixed = fixedFlat;
  };
  structured = derivation {
    name = "structured-attrs";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" "echo > $out" ];
    __structuredAttrs = true;
    list = [ 1 "two" { three = "3\"q\""; } ];
    deps = [ plain ];
  };
in { inherit plain multi fixedFlat fixedRec fixedSha1 floating impure escapes withInputs structured; }
