"""The control plane: the control loop and, later, the provisioners it drives."""
