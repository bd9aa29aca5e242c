import os
import shlex
import sys

from .cli import main

os.environ["POCKET_TEACHER_COMMAND"] = shlex.join(["python", "-m", "pocket_teacher", *sys.argv[1:]])  # environment.json
sys.exit(main())
