# NixOS module: the nixmux agent, and the Nix daemon's builders going through it.
# See docs/agent.md. Usage:
#   imports = [ ./nixmux-agent.nix ];
#   services.nixmux-agent = { enable = true; package = pkgs.nixmux; machines = "..."; };
{ config, lib, pkgs, ... }:

let
  cfg = config.services.nixmux-agent;
  machinesFile = pkgs.writeText "nixmux-machines" cfg.machines;
  socket = "/run/nixmux/agent.sock";
  # The machines file for Nix: every builder as localhost + `nixmux connect NAME`.
  nixMachines = pkgs.runCommand "nixmux-machines-for-nix" { } ''
    ${cfg.package}/bin/nixmux agent machines \
      --machines ${machinesFile} --socket ${socket} \
      --program ${cfg.package}/bin/nixmux > $out
  '';
in
{
  options.services.nixmux-agent = {
    enable = lib.mkEnableOption "the nixmux agent (pooled SSH connections for remote builds)";
    package = lib.mkOption {
      type = lib.types.package;
      description = "The nixmux package.";
    };
    machines = lib.mkOption {
      type = lib.types.lines;
      description = ''
        The real builders, in machines-file syntax (store URI, systems, SSH key, max jobs,
        speed factor, features, mandatory features, base64 host key). The key files must
        be readable by the `nixmux` user.
      '';
    };
    spares = lib.mkOption {
      type = lib.types.ints.unsigned;
      default = 2;
      description = "Remote Nix processes kept started per builder.";
    };
    metricsPort = lib.mkOption {
      type = lib.types.nullOr lib.types.port;
      default = null;
      description = "Serve Prometheus metrics on 127.0.0.1 at this port.";
    };
  };

  config = lib.mkIf cfg.enable {
    users.users.nixmux = {
      isSystemUser = true;
      group = "nixmux";
      home = "/var/lib/nixmux";
      createHome = true;
    };
    users.groups.nixmux = { };

    systemd.services.nixmux-agent = {
      description = "nixmux agent";
      wantedBy = [ "multi-user.target" ];
      before = [ "nix-daemon.service" ];
      after = [ "network-online.target" ];
      wants = [ "network-online.target" ];
      serviceConfig = {
        User = "nixmux";
        Group = "nixmux";
        RuntimeDirectory = "nixmux";
        ExecStart = lib.concatStringsSep " " ([
          "${cfg.package}/bin/nixmux agent -v"
          "--machines ${machinesFile}"
          "--socket ${socket}"
          "--spares ${toString cfg.spares}"
        ] ++ lib.optional (cfg.metricsPort != null) "--metrics ${toString cfg.metricsPort}");
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        TimeoutStopSec = 90;
        Restart = "on-failure";
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ReadWritePaths = [ "/var/lib/nixmux" ];
      };
    };

    nix.settings.builders = "@${nixMachines}";
  };
}
