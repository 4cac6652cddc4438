"""Entry point of ``python -m lit_prune.toy {prepare,train,evaluate,package,all}``."""

from lit_prune.toy.train import main

if __name__ == "__main__":
    main()
