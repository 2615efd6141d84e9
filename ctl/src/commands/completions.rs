use clap::CommandFactory;
use clap_complete::Shell;

pub fn run(shell: Shell) {
    let mut command = crate::Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "gpuctl", &mut script);
    crate::emit(&String::from_utf8_lossy(&script));
}
